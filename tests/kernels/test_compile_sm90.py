"""Every Triton kernel compiles for an H100 (sm_90), through its launcher, without a GPU.

The interpreter tests check what the kernels compute; this checks that the compiler accepts
them (the interpreter is more lenient). See compile_sm90.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_sm90.py")
KERNELS = {"_count_kernel", "_scatter_kernel", "_down_kernel", "_gate_up_kernel",
           "_flash_attn_kernel", "_lse_merge_kernel", "_paged_decode_kernel",
           "_rms_norm_kernel", "_rotary_kernel", "_topk_gating_kernel"}


def compile_all(*flags):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return set(proc.stdout.split())


def test_kernels_compile_for_sm90_bf16():
    assert compile_all() == KERNELS


@pytest.mark.slow
def test_kernels_compile_for_sm90_all_dtypes_and_head_dims():
    assert compile_all("--full") == KERNELS
