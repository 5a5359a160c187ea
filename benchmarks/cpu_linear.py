"""CPU GEMMs: `F.linear` (BLAS, repacks the weight every call) vs oneDNN with weights packed
once (`kernels.cpu_linear`), in the same run.

    python benchmarks/cpu_linear.py [--rows 1 8 64 256 1024 8192] [--dtype float32 bfloat16]
                                    [--shapes] [--experts]

One "step" runs the 17 linear layers of the throughput benchmark's tiny Llama (H 256,
I 768, 4 layers, vocab 384) in order, each with its own weight, as a decode or prefill step of
that many rows does. Prints ms per step for both and the ratio (> 1: packed faster).

`--shapes` times single calls instead, one weight shape at a time from 64x64 up, with
COLD_FLUSH_BYTES streamed through the caches before each call (as a model step's other weights
and KV cache do): where packing stops paying (`cpu_linear.MIN_PACKED_ELEMENTS`).
`--experts` does the same for a MoE layer's experts (8, top-2, fp32) at several sizes: dense
stacks (padded batched matmuls) vs `cpu_experts.PackedExperts` (per-expert packed loop), at
32 and 64 decode tokens and a 1024-token prefill (`cpu_experts.MIN_PACKED_EXPERT_ELEMENTS`).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from titanserve.kernels import cpu_linear
from titanserve.kernels.cpu_experts import PackedExperts
from titanserve.kernels.fused_moe import fused_moe_torch, input_major

# (out, in) of qkv, o, gate_up, down per layer, then the lm_head
LLAMA_SHAPES = [(512, 256), (256, 256), (1536, 256), (256, 768)] * 4 + [(384, 256)]
SWEEP_SHAPES = [(64, 64), (256, 64), (256, 256), (512, 256), (768, 256), (1536, 256), (576, 576)]
COLD_FLUSH_BYTES, COLD_CALLS = 48 << 20, 60
EXPERT_SIZES = [(64, 48), (128, 192), (256, 192), (256, 384), (384, 512), (576, 768)]  # (H, I)


def _ms_per_step(run, rows: int, repeats: int = 3) -> float:
    """Best of `repeats` timings, each over enough steps to take ~0.1 s."""
    for _ in range(3):
        run()
    steps = max(3, 6400 // max(rows, 1))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            run()
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1e3


def _cold_us(call, flush: torch.Tensor) -> float:
    """Median µs of call() with `flush` rewritten (caches evicted) before each call."""
    times = []
    for _ in range(COLD_CALLS):
        flush.add_(1.0)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def sweep_shapes(dtype: torch.dtype, rows_list: list[int]) -> None:
    """Per weight shape and row count: cold µs per call, F.linear vs packed."""
    flush = torch.zeros(COLD_FLUSH_BYTES // 4)
    for n, k in SWEEP_SHAPES:
        weight = torch.randn(n, k).mul_(0.02).to(dtype)
        packed = cpu_linear.pack(weight)
        cpu_linear.warm_up_packed([packed], max(rows_list))
        for rows in rows_list:
            x = torch.randn(rows, k).to(dtype)
            dense_us = _cold_us(partial(F.linear, x, weight), flush)
            packed_us = _cold_us(partial(cpu_linear.linear, x, packed), flush)
            print(
                f"{str(dtype)[6:]:>9} {n:>5}x{k:<4} ({n * k:>7} elements) rows {rows:>4}: "
                f"F.linear {dense_us:7.0f} µs  packed {packed_us:7.0f} µs  "
                f"x{dense_us / packed_us:.2f}",
                flush=True,
            )


def sweep_experts(tokens_list: list[int]) -> None:
    """Per expert size and token count: cold µs per fused MoE call, dense vs packed."""
    flush = torch.zeros(COLD_FLUSH_BYTES // 4)
    num_experts, top_k = 8, 2
    for hidden, inter in EXPERT_SIZES:
        w_gate_up = torch.randn(num_experts, 2 * inter, hidden).mul_(0.05)
        w_down = torch.randn(num_experts, hidden, inter).mul_(0.05)
        dense = (input_major(w_gate_up), input_major(w_down))
        packed = (PackedExperts(w_gate_up), PackedExperts(w_down))
        cpu_linear.warm_up_packed([packed[0][0], packed[1][0]], max(tokens_list) * top_k)
        for tokens in tokens_list:
            x = torch.randn(tokens, hidden)
            weights, ids = torch.randn(tokens, num_experts).softmax(-1).topk(top_k)
            dense_us = _cold_us(partial(fused_moe_torch, x, *dense, weights, ids), flush)
            packed_us = _cold_us(partial(fused_moe_torch, x, *packed, weights, ids), flush)
            print(
                f"experts H {hidden:>4} I {inter:>4} ({3 * hidden * inter:>7} elements each) "
                f"tokens {tokens:>4}: dense {dense_us:7.0f} µs  packed {packed_us:7.0f} µs  "
                f"x{dense_us / packed_us:.2f}",
                flush=True,
            )


def _step(linear, inputs: dict[int, torch.Tensor], weights: list[torch.Tensor]) -> None:
    for weight in weights:
        linear(inputs[weight.shape[1]], weight)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", type=int,
                        help="rows per call (default: 1 8 64 256 1024 8192; --shapes: 16 64 256)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--shapes", action="store_true",
                        help="time single cold calls per weight shape")
    parser.add_argument("--experts", action="store_true",
                        help="time cold fused MoE calls per expert size (tokens: 32 64 1024)")
    args = parser.parse_args(argv)
    rows_list = args.rows or ([16, 64, 256] if args.shapes else [1, 8, 64, 256, 1024, 8192])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.experts:
        if cpu_linear.can_pack(torch.zeros(2, 2)):
            sweep_experts(args.rows or [32, 64, 1024])
        else:
            print("cannot pack here (no oneDNN)")
        return 0
    for name in args.dtype:
        dtype = getattr(torch, name)
        weights = [torch.randn(n, k).mul_(0.02).to(dtype) for n, k in LLAMA_SHAPES]
        if not all(cpu_linear.can_pack(w) for w in weights):
            print(f"{name}: cannot pack here (no oneDNN or no {name} support)")
            continue
        if args.shapes:
            sweep_shapes(dtype, rows_list)
            continue
        packed = [cpu_linear.pack(w) for w in weights]
        for rows in rows_list:
            inputs = {k: torch.randn(rows, k).to(dtype) for k in (256, 768)}
            dense_ms = _ms_per_step(partial(_step, F.linear, inputs, weights), rows)
            packed_ms = _ms_per_step(partial(_step, cpu_linear.linear, inputs, packed), rows)
            print(
                f"{name:>9} rows {rows:>5}: F.linear {dense_ms:8.3f} ms  packed {packed_ms:8.3f} "
                f"ms  x{dense_ms / packed_ms:.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
