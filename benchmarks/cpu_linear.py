"""CPU GEMMs: `F.linear` (BLAS, repacks the weight every call) vs oneDNN with weights packed
once (`kernels.cpu_linear`), in the same run.

    python benchmarks/cpu_linear.py [--rows 1 8 64 256 1024 8192] [--dtype float32 bfloat16]

One "step" runs the 17 linear layers of the throughput benchmark's tiny Llama (H 256,
I 768, 4 layers, vocab 384) in order, each with its own weight, as a decode or prefill step of
that many rows does. Prints ms per step for both and the ratio (> 1: packed faster).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from titanserve.kernels import cpu_linear

# (out, in) of qkv, o, gate_up, down per layer, then the lm_head
LLAMA_SHAPES = [(512, 256), (256, 256), (1536, 256), (256, 768)] * 4 + [(384, 256)]


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


def _step(linear, inputs: dict[int, torch.Tensor], weights: list[torch.Tensor]) -> None:
    for weight in weights:
        linear(inputs[weight.shape[1]], weight)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 64, 256, 1024, 8192])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.dtype:
        dtype = getattr(torch, name)
        weights = [torch.randn(n, k).mul_(0.02).to(dtype) for n, k in LLAMA_SHAPES]
        if not all(cpu_linear.can_pack(w) for w in weights):
            print(f"{name}: cannot pack here (no oneDNN or no {name} support)")
            continue
        packed = [cpu_linear.pack(w) for w in weights]
        for rows in args.rows:
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
