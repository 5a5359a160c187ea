"""Tune the fused-MoE tile sizes on this GPU and write a JSON table the launcher loads.

    python -m titanserve.kernels.tune_fused_moe --num-experts 8 --hidden 4096 \\
        --intermediate 14336 --top-k 2 --out FILE.json

The table maps a token count to the fastest {BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages}
found for it (vLLM's fused_moe config format). `fused_moe` reads tables named
`config_file_name(...)` (printed at the end) from `$TITANSERVE_MOE_CONFIG_DIR` or
`titanserve/kernels/configs/`, and uses the entry nearest the batch's token count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from titanserve.kernels.fused_moe import config_file_name, fused_moe_triton

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SEARCH_SPACE = {
    "BLOCK_M": (16, 32, 64, 128),
    "BLOCK_N": (32, 64, 128, 256),
    "BLOCK_K": (64, 128),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4),
}


SMALL_SEARCH_SPACE = {
    "BLOCK_M": (16, 64),
    "BLOCK_N": (64, 128),
    "BLOCK_K": (64,),
    "num_warps": (4,),
    "num_stages": (3,),
}


def candidate_configs(num_tokens: int, top_k: int, num_experts: int, small: bool = False):
    """The search space, without BLOCK_M far above the expected rows per expert."""
    per_expert = num_tokens * top_k / num_experts
    space = SMALL_SEARCH_SPACE if small else SEARCH_SPACE
    configs = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    return [c for c in configs if c["BLOCK_M"] <= max(16, 2 * per_expert)]


def tune_one(num_tokens: int, args: argparse.Namespace, weights: tuple) -> tuple[dict, float]:
    """The fastest config for `num_tokens` tokens and its time in ms."""
    import triton.testing
    from triton.runtime.errors import OutOfResources

    w_gate_up, w_down = weights
    dtype, device = w_gate_up.dtype, w_gate_up.device
    x = torch.randn(num_tokens, args.hidden, dtype=dtype, device=device)
    logits = torch.randn(num_tokens, args.num_experts, device=device)
    topk_weights, topk_ids = torch.topk(logits.softmax(-1), args.top_k, dim=-1)
    best, best_ms = None, float("inf")
    for config in candidate_configs(num_tokens, args.top_k, args.num_experts, args.small):
        def run(config=config):
            fused_moe_triton(x, w_gate_up, w_down, topk_weights, topk_ids, config=config)

        try:
            ms = triton.testing.do_bench(run, warmup=5, rep=args.rep_ms)
        except OutOfResources:  # too much shared memory / registers for this GPU: skip it
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    assert best is not None, "no config ran"
    return best, best_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-experts", type=int, default=8, help="experts on one GPU (E)")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (K)")
    parser.add_argument("--intermediate", type=int, default=14336, help="expert MLP size (N)")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)),
                        help="comma-separated token counts to tune for")
    parser.add_argument("--rep-ms", type=int, default=50, help="benchmark time per config")
    parser.add_argument("--small", action="store_true", help="a small search space (quick)")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_fused_moe: needs a CUDA GPU to time kernels; nothing tuned on this machine.")
        return 0
    dtype = getattr(torch, args.dtype)
    E, H, inter = args.num_experts, args.hidden, args.intermediate
    w_gate_up = torch.randn(E, 2 * inter, H, dtype=dtype, device="cuda") / H**0.5
    w_down = torch.randn(E, H, inter, dtype=dtype, device="cuda") / inter**0.5
    table = {}
    for num_tokens in (int(m) for m in args.batch_sizes.split(",")):
        config, ms = tune_one(num_tokens, args, (w_gate_up, w_down))
        table[str(num_tokens)] = config
        print(f"T={num_tokens:5d}  {ms * 1e3:9.1f} us  {config}", flush=True)
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    name = config_file_name(E, inter, H, dtype, torch.cuda.get_device_name())
    print(f"wrote {args.out}; fused_moe loads it as {name} in $TITANSERVE_MOE_CONFIG_DIR "
          "or titanserve/kernels/configs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
