"""rms_norm: the torch implementation vs a dumb per-row loop (HF's LlamaRMSNorm, spelled out),
and the Triton kernel (interpreted on CPU, compiled on GPU) vs the torch implementation."""

import pytest
import torch

from titanserve.kernels import forced_backend, ops
from titanserve.kernels.launch import interpreting
from titanserve.kernels.rms_norm import rms_norm_torch, rms_norm_triton

interp = pytest.mark.skipif(not interpreting(), reason="Triton is compiling (GPU): see gpu tests")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rms_norm_loop(x, weight, eps):
    rows = []
    for row in x.reshape(-1, x.shape[-1]):
        r = row.float()
        variance = sum(float(v) ** 2 for v in r) / r.numel()
        rows.append(weight * (r / (variance + eps) ** 0.5).to(x.dtype))
    return torch.stack(rows).reshape(x.shape) if rows else weight * x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_matches_loop(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 24, generator=gen).to(dtype)
    weight = torch.randn(24, generator=gen).to(dtype)
    residual = torch.randn(2, 3, 24, generator=gen).to(dtype)
    torch.testing.assert_close(rms_norm_torch(x, weight, 1e-6), rms_norm_loop(x, weight, 1e-6))
    normed, s = rms_norm_torch(x, weight, 1e-6, residual=residual)
    torch.testing.assert_close(s, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, rms_norm_loop(x + residual, weight, 1e-6))


def test_output_dtype_follows_hf_promotion():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert rms_norm_torch(x, torch.ones(8), 1e-6).dtype == torch.float32
    assert rms_norm_torch(x, torch.ones(8, dtype=torch.bfloat16), 1e-6).dtype == torch.bfloat16


@interp
@pytest.mark.parametrize("T", [0, 1, 7, 33])
@pytest.mark.parametrize("H", [64, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_torch(T, H, dtype):
    gen = torch.Generator().manual_seed(T * H)
    x = torch.randn(T, H, generator=gen).to(dtype)
    weight = torch.randn(H, generator=gen).to(dtype)
    residual = torch.randn(T, H, generator=gen).to(dtype)
    torch.testing.assert_close(rms_norm_triton(x, weight, 1e-5), rms_norm_torch(x, weight, 1e-5))
    got = rms_norm_triton(x, weight, 1e-5, residual)
    want = rms_norm_torch(x, weight, 1e-5, residual)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@interp
def test_ops_dispatch_strided_rows_and_leading_dims():
    x = torch.randn(3, 5, 2 * 32)[..., :32]  # rows strided, last dim contiguous
    weight = torch.randn(32)
    with forced_backend("triton"):
        got = ops.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(got, rms_norm_torch(x, weight, 1e-6))


def test_shape_errors():
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(torch.randn(3, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        ops.rms_norm(torch.randn(3, 8), torch.ones(8), 1e-6, residual=torch.randn(2, 8))


@gpu
@pytest.mark.gpu
def test_triton_matches_torch_cuda_bf16():
    x = torch.randn(33, 4096, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    got = rms_norm_triton(x, weight, 1e-6, residual)
    want = rms_norm_torch(x, weight, 1e-6, residual)
    torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[1], want[1], atol=2e-2, rtol=2e-2)
