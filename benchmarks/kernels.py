"""Kernel speed on one GPU: titanserve's Triton kernels against torch baselines, same run.

    python benchmarks/kernels.py [--dtype bfloat16]

* fused MoE (Mixtral-8x7B and Qwen3-30B-A3B expert shapes): ours vs `torch._grouped_mm` (when
  this torch has it) vs a per-expert loop of matmuls (our torch backend);
* causal prefill attention: `flash_attn_fwd` vs `F.scaled_dot_product_attention`;
* decode attention over a paged KV cache: `paged_decode_attn` vs SDPA on the same keys laid out
  contiguously (a lower bound: no page indirection).

Prints µs per call and baseline/ours ratios (> 1 means ours is faster). Needs a CUDA GPU; on
CPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F

from titanserve.kernels.flash_attn import flash_attn_fwd_triton
from titanserve.kernels.fused_moe import activate, fused_moe_torch, fused_moe_triton
from titanserve.kernels.paged_decode import paged_decode_attn_triton

MOE_SHAPES = {  # name: (experts, hidden, intermediate, top_k)
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
}


def bench_us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=100) * 1e3


def grouped_mm_moe(x, w_gate_up, w_down, topk_weights, topk_ids):
    """MoE through torch._grouped_mm: sort pairs by expert, two grouped GEMMs, scatter-add."""
    T, K = topk_ids.shape
    inter = w_down.shape[2]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.bincount(flat, minlength=w_gate_up.shape[0]).cumsum(0).to(torch.int32)
    xs = x[order // K]  # (T*K, H) grouped by expert
    h = torch._grouped_mm(xs, w_gate_up.transpose(1, 2), offs=offs).float()  # (T*K, 2I)
    a = activate(h[:, :inter], h[:, inter:], "silu", 0.0, 0.0).to(x.dtype)
    y = torch._grouped_mm(a, w_down.transpose(1, 2), offs=offs).float()  # (T*K, H)
    y *= topk_weights.reshape(-1)[order, None]
    return torch.zeros(T, x.shape[1], device=x.device).index_add_(0, order // K, y).to(x.dtype)


def bench_moe(dtype: torch.dtype) -> None:
    print(f"\nfused MoE ({dtype}): µs per call; ratio = baseline / ours")
    print(f"{'model':>14} {'T':>5} {'ours':>9} {'grouped_mm':>11} {'ratio':>6} "
          f"{'loop':>9} {'ratio':>6}")
    for name, (E, H, inter, K) in MOE_SHAPES.items():
        w_gate_up = torch.randn(E, 2 * inter, H, dtype=dtype, device="cuda") / H**0.5
        w_down = torch.randn(E, H, inter, dtype=dtype, device="cuda") / inter**0.5
        for T in (1, 16, 256, 4096):
            x = torch.randn(T, H, dtype=dtype, device="cuda")
            weights, ids = torch.topk(torch.randn(T, E, device="cuda").softmax(-1), K)
            args = (x, w_gate_up, w_down, weights, ids)
            ours = bench_us(partial(fused_moe_triton, *args))
            loop = bench_us(partial(fused_moe_torch, *args))
            try:
                grouped = bench_us(partial(grouped_mm_moe, *args))
                grouped_s = f"{grouped:11.1f} {grouped / ours:6.2f}"
            except (AttributeError, RuntimeError) as exc:  # old torch, or not on this GPU/dtype
                grouped_s = f"{'n/a':>11} {'':>6}"
                print(f"  (torch._grouped_mm unavailable: {str(exc).splitlines()[0][:80]})")
            print(f"{name:>14} {T:5d} {ours:9.1f} {grouped_s} {loop:9.1f} {loop / ours:6.2f}")


def bench_attention(dtype: torch.dtype) -> None:
    Hq, Hk, D = 32, 8, 128
    print(f"\nprefill attention ({dtype}, Hq={Hq}, Hk={Hk}, D={D}, causal): µs; ratio = sdpa/ours")
    for T in (512, 2048, 8192):
        q = torch.randn(T, Hq, D, dtype=dtype, device="cuda")
        k, v = (torch.randn(T, Hk, D, dtype=dtype, device="cuda") for _ in range(2))
        ours = bench_us(partial(flash_attn_fwd_triton, q, k, v, causal=True))
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
        sdpa = bench_us(partial(F.scaled_dot_product_attention, qs, ks, vs, is_causal=True,
                                enable_gqa=True))
        print(f"  T={T:5d}  ours {ours:9.1f}  sdpa {sdpa:9.1f}  ratio {sdpa / ours:5.2f}")

    block_size = 16
    print(f"\npaged decode ({dtype}, block_size={block_size}): µs; ratio = sdpa(contiguous)/ours")
    for B, L in ((1, 32768), (32, 4096), (256, 1024)):
        num_blocks = B * L // block_size
        k_cache, v_cache = (torch.randn(num_blocks, block_size, Hk, D, dtype=dtype,
                                        device="cuda") for _ in range(2))
        tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(B, -1)
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        q = torch.randn(B, Hq, D, dtype=dtype, device="cuda")
        ours = bench_us(partial(paged_decode_attn_triton, q, k_cache, v_cache, tables, lens))
        ks = k_cache[tables.long()].flatten(1, 2).transpose(1, 2)  # (B, Hk, L, D)
        vs = v_cache[tables.long()].flatten(1, 2).transpose(1, 2)  # (B, Hk, L, D)
        sdpa = bench_us(partial(F.scaled_dot_product_attention, q[:, :, None], ks, vs,
                                enable_gqa=True))
        print(f"  B={B:4d} L={L:6d}  ours {ours:9.1f}  sdpa {sdpa:9.1f}  ratio {sdpa / ours:5.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: needs a CUDA GPU (the Triton kernels only run compiled "
              "there); nothing to measure on this machine.")
        return 0
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bench_moe(dtype)
    bench_attention(dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
