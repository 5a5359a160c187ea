"""Compile every Triton kernel for an H100 (sm_90) without a GPU, through the real launchers.

Run as a script in its own process (Triton must be imported with TRITON_INTERPRET=0): a stand-in
driver reports an sm_90 target and every launch only compiles (`warmup`), so shapes, dtypes,
constexprs and grids come from the launchers exactly as they would on a GPU. Prints one line
per compiled kernel; exits non-zero when a kernel does not compile. Default: bf16, head dim 80;
`--full`: also fp32 and head dims 64 and 128.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "0", "run with TRITON_INTERPRET=0"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import titanserve.kernels.fused_moe as fused_moe_mod  # noqa: E402
import titanserve.kernels.launch as launch  # noqa: E402
from titanserve.kernels import moe_align  # noqa: E402
from titanserve.kernels.flash_attn import flash_attn_fwd_triton  # noqa: E402
from titanserve.kernels.fused_moe import fused_moe_triton  # noqa: E402
from titanserve.kernels.lse_merge import lse_merge_triton  # noqa: E402
from titanserve.kernels.paged_decode import paged_decode_attn_triton  # noqa: E402
from titanserve.kernels.rms_norm import rms_norm_triton  # noqa: E402
from titanserve.kernels.rotary import rotary_triton  # noqa: E402
from titanserve.kernels.topk_gating import topk_gating_triton  # noqa: E402


class _Sm90Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


compiled: list[str] = []
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    assert "cubin" in kernel.asm, self.fn.__name__
    compiled.append(self.fn.__name__)
    return kernel


def _align_on_host(topk_ids, num_experts, block_m, expert_map=None):
    """Real alignment (torch), so that fused_moe launches its GEMM kernels."""
    sorted_ids, block_ids, _ = moe_align.moe_align_torch(topk_ids, num_experts, block_m, expert_map)
    counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts)
    return sorted_ids, block_ids, (counts + block_m - 1) // block_m * block_m


def main(full: bool) -> None:
    driver.set_active(_Sm90Driver())
    JITFunction.run = _compile_only
    launch.interpreting = lambda: True  # let the launchers accept CPU tensors
    for dtype in (torch.bfloat16, torch.float32) if full else (torch.bfloat16,):
        x = torch.randn(5, 96, dtype=dtype)
        rms_norm_triton(x, torch.ones(96, dtype=dtype), 1e-6, residual=x)
        q, k = torch.randn(5, 4, 80, dtype=dtype), torch.randn(5, 2, 80, dtype=dtype)
        rotary_triton(q, k, torch.arange(5), torch.randn(16, 64), is_neox=True)
        rotary_triton(q, k, torch.arange(5), torch.randn(16, 64), is_neox=False)
        logits = torch.randn(5, 16, dtype=dtype)
        topk_gating_triton(logits, 2)
        topk_gating_triton(logits, 4, "sigmoid", True, torch.randn(16), 4, 2, 2.5)
        ids = torch.randint(0, 8, (5, 2))
        moe_align.moe_align_triton(ids, 8, 16, torch.arange(8, dtype=torch.int32))
        moe_align.align_blocks(ids, 8, 16)
        w13, w2 = torch.randn(4, 128, 96, dtype=dtype), torch.randn(4, 96, 64, dtype=dtype)
        fused_moe_mod.align_blocks = _align_on_host
        em = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32)
        fused_moe_triton(x, w13, w2, torch.rand(5, 2), ids, em)
        fused_moe_triton(x, w13, w2, torch.rand(5, 2), ids % 4, None, "swiglu_oai",
                         torch.randn(4, 128, dtype=dtype), torch.randn(4, 96, dtype=dtype))
        fused_moe_mod.align_blocks = moe_align.align_blocks
        for D in (64, 80, 128) if full else (80,):
            q, kv = torch.randn(7, 4, D, dtype=dtype), torch.randn(9, 2, D, dtype=dtype)
            flash_attn_fwd_triton(q, kv, kv, causal=True, q_offset=2)
            flash_attn_fwd_triton(q, kv, kv, causal=False)
            long_q = torch.randn(130, 4, D, dtype=dtype)  # the 128-row, 3-stage launch config
            flash_attn_fwd_triton(long_q, long_q[:, :2], long_q[:, :2], causal=True)
            cache = torch.randn(6, 16, 2, D, dtype=dtype)
            tables = torch.zeros(3, 4, dtype=torch.int32)
            lens = torch.tensor([0, 5, 60], dtype=torch.int32)
            paged_decode_attn_triton(q[:3], cache, cache, tables, lens, num_splits=3)
        lse_merge_triton(torch.randn(3, 5, 4, 80, dtype=dtype), torch.randn(3, 5, 4))
    print("\n".join(sorted(set(compiled))))


if __name__ == "__main__":
    try:
        main(full="--full" in sys.argv)
    except Exception as exc:  # report which kernel failed, then fail the process
        print(f"compile failed: {exc!r}", file=sys.stderr)
        raise
