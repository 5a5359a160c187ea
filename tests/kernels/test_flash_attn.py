"""flash_attn_fwd: torch implementation vs a per-(query, head) loop, Triton vs torch; GQA,
causal offsets of both signs (ring chunks, prefill over a cached context), fully masked rows."""

import math

import pytest
import torch

from titanserve.kernels import forced_backend, ops
from titanserve.kernels.flash_attn import (
    dense_attention_with_lse,
    flash_attn_fwd_torch,
    flash_attn_fwd_triton,
)
from titanserve.kernels.launch import interpreting

interp = pytest.mark.skipif(not interpreting(), reason="Triton is compiling (GPU): see gpu tests")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def attention_loop(q, k, v, causal, q_offset, scale=None):
    Tq, Hq, D = q.shape
    group = Hq // k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(Tq, Hq, D)
    lse = torch.full((Tq, Hq), float("-inf"))
    for i in range(Tq):
        for h in range(Hq):
            keys = [j for j in range(k.shape[0]) if not causal or j <= i + q_offset]
            if not keys:
                continue
            s = torch.stack([q[i, h].float() @ k[j, h // group].float() * scale for j in keys])
            lse[i, h] = torch.logsumexp(s, 0)
            p = torch.exp(s - lse[i, h])
            out[i, h] = sum(p[n] * v[j, h // group].float() for n, j in enumerate(keys))
    return out.to(q.dtype), lse


def make_qkv(Tq, Tk, Hq, Hk, D, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, D, generator=gen).to(device, dtype)
            for n, h in ((Tq, Hq), (Tk, Hk), (Tk, Hk))]


def assert_attention_close(got, want, **tol):
    torch.testing.assert_close(got[0], want[0], **tol)
    assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1]))
    finite = ~torch.isinf(want[1])
    torch.testing.assert_close(got[1][finite], want[1][finite], **tol)
    assert not torch.isnan(got[0]).any() and not torch.isnan(got[1]).any()


# (Tq, Tk, Hq, Hk, D, causal, q_offset)
CASES = [
    (7, 7, 4, 2, 64, True, 0),  # plain causal prefill, GQA
    (5, 12, 2, 1, 80, True, 7),  # a prefill chunk over its cached context: q_offset = Tk - Tq
    (6, 9, 2, 2, 64, True, -3),  # ring step with keys after the queries: first rows masked
    (4, 9, 2, 2, 64, True, -9),  # every row masked
    (3, 5, 4, 4, 80, True, 50),  # all keys visible
    (1, 33, 4, 2, 80, False, 0),
    (5, 0, 2, 1, 64, True, 0),  # no keys
    (0, 5, 2, 1, 64, True, 0),  # no queries
]


@pytest.mark.parametrize("Tq,Tk,Hq,Hk,D,causal,q_offset", CASES)
def test_torch_matches_loop(Tq, Tk, Hq, Hk, D, causal, q_offset):
    q, k, v = make_qkv(Tq, Tk, Hq, Hk, D)
    got = flash_attn_fwd_torch(q, k, v, causal, q_offset)
    assert got[0].shape == (Tq, Hq, D) and got[1].dtype == torch.float32
    assert_attention_close(got, attention_loop(q, k, v, causal, q_offset))


@pytest.mark.parametrize("causal", [True, False])
def test_dense_fallback_matches_loop(causal):
    """The math the torch backend uses on GPU (SDPA there returns no lse), checked on CPU."""
    q, k, v = make_qkv(6, 9, 4, 2, 64)
    got = dense_attention_with_lse(q, k, v, causal, 0.125)
    assert_attention_close(got, attention_loop(q, k, v, causal, 0, scale=0.125))


def test_torch_custom_scale_and_bf16():
    q, k, v = make_qkv(5, 8, 2, 1, 64, torch.bfloat16)
    got = flash_attn_fwd_torch(q, k, v, True, 3, scale=0.3)
    assert got[0].dtype == torch.bfloat16
    assert_attention_close(got, attention_loop(q, k, v, True, 3, scale=0.3), atol=2e-2, rtol=2e-2)


# 16-row blocks: unmasked key blocks, then the masked ones (diagonal, Tk's ragged end)
TRITON_CASES = [
    (33, 40, 4, 1, 80, True, 7),  # padded head dim
    (40, 50, 4, 2, 64, True, 14),  # row 16 sees keys <= 30: one short of an unmasked block
    (20, 30, 2, 1, 64, True, 1),  # row 15 sees key 16, the first of the next block
    (20, 33, 2, 1, 64, False, 0),
    (33, 33, 2, 2, 64, True, -20),
]


@interp
@pytest.mark.parametrize("Tq,Tk,Hq,Hk,D,causal,q_offset", [*CASES, *TRITON_CASES])
def test_triton_matches_torch(Tq, Tk, Hq, Hk, D, causal, q_offset):
    q, k, v = make_qkv(Tq, Tk, Hq, Hk, D)
    got = flash_attn_fwd_triton(q, k, v, causal, q_offset, block_m=16, block_n=16)
    assert_attention_close(got, flash_attn_fwd_torch(q, k, v, causal, q_offset))


@interp
@pytest.mark.parametrize("Tq,Tk,D,causal,q_offset", [(130, 135, 64, True, 5),
                                                     (9, 70, 80, False, 0)])
def test_triton_default_blocks(Tq, Tk, D, causal, q_offset):
    """The launcher's own blocks: 128 query rows from Tq = 128 on, fewer below."""
    q, k, v = make_qkv(Tq, Tk, 2, 1, D)
    got = flash_attn_fwd_triton(q, k, v, causal, q_offset)
    assert_attention_close(got, flash_attn_fwd_torch(q, k, v, causal, q_offset))


@interp
def test_ops_dispatch_strided_views_fp16():
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(9, 4 + 2 + 2, 64, generator=gen).half()  # fused heads: strided views
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    with forced_backend("triton"):
        got = ops.flash_attn_fwd(q, k, v, causal=True, q_offset=0)
    assert_attention_close(got, flash_attn_fwd_torch(q, k, v), atol=2e-3, rtol=2e-3)


def test_shape_errors():
    q, k = torch.randn(3, 6, 64), torch.randn(3, 4, 64)
    with pytest.raises(ValueError, match="multiple"):
        ops.flash_attn_fwd(q, k, k)
    with pytest.raises(ValueError, match="both"):
        ops.flash_attn_fwd(q, k, k[:2])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("Tq,Tk,q_offset", [(1, 1, 0), (333, 333, 0), (100, 1000, 900),
                                            (64, 64, -32)])
@pytest.mark.parametrize("D", [64, 80, 128])
def test_triton_matches_torch_cuda_bf16(Tq, Tk, q_offset, D):
    q, k, v = make_qkv(Tq, Tk, 8, 2, D, torch.bfloat16, "cuda")
    got = flash_attn_fwd_triton(q, k, v, True, q_offset)
    want = flash_attn_fwd_torch(q.float(), k.float(), v.float(), True, q_offset)
    assert_attention_close((got[0].float(), got[1]), want, atol=2e-2, rtol=2e-2)
